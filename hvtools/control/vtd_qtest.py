"""QEMU's intel-iommu and ``edu`` device under qtest: one DMA at a time, with its fault record.

The differential test of the VT-d model (issue 3, proof 2) runs here: :class:`VtdQtestBench`
starts a q35 QEMU with ``intel-iommu`` (any properties) and the ``edu`` device behind it,
exposes guest RAM as a :class:`~hvtools.qemu.qtest.QtestMemory` (so tables built with
:mod:`hvtools.iommu.build` and walked by :mod:`hvtools.iommu.walk` are the very bytes QEMU
reads), programs the remapping unit's registers the way a driver does (VT-d 4.x s11.4) and
runs edu DMAs (QEMU docs/specs/edu.rst), returning what the unit recorded (s7.1.3, s11.4.7).

There is no firmware under qtest, so the edu function is set up through PCI configuration
mechanism #1 (ports 0xCF8/0xCFC): BAR0 at :data:`EDU_BAR0`, COMMAND = memory space | bus
master. The edu device has no MMIO window onto its 4 KiB DMA buffer; :meth:`VtdQtestBench.
load_buffer` / :meth:`~VtdQtestBench.dump_buffer` move it through a staging area in RAM with
translation switched off (GCMD.TE=0: DMA is untranslated, s11.4.4.1), so no table the test
builds is needed to see what a DMA read brought in.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import IntEnum
from types import TracebackType
from typing import Self

from hvtools.bits import BitField
from hvtools.errors import HvTimeout, UsageError, VmError
from hvtools.iommu.regs import CAP_REG_OFFSET, ECAP_REG_OFFSET, Q35_DMAR_BASE, IommuCaps
from hvtools.iommu.structures import (
    CCMD_REG_OFFSET,
    FSTS_REG_OFFSET,
    GCMD_REG_OFFSET,
    GSTS_REG_OFFSET,
    IQA_REG_OFFSET,
    IQH_REG_OFFSET,
    IQT_REG_OFFSET,
    RTADDR_REG_OFFSET,
    FaultRecord,
    FstsReg,
    GstsReg,
    VtdStruct,
)
from hvtools.iommu.walk import Access, DmaRequest, source_id
from hvtools.memory.ramfile import q35_ram_layout
from hvtools.qemu.qtest import QtestMemory, QtestQemu

#: Where the edu function sits by default (bus 0, device 3, function 0).
EDU_BDF = (0, 3, 0)
#: PCI vendor:device of edu (0x1234:0x11e8) as read from config dword 0.
EDU_ID = 0x11E8_1234
#: A free 1 MiB-aligned address in q35's 32-bit PCI hole for edu's 1 MiB BAR0.
EDU_BAR0 = 0xE000_0000
#: edu's DMA buffer, as the device addresses it, and its size (docs/specs/edu.rst).
EDU_BUFFER = 0x40000
EDU_BUFFER_SIZE = 0x1000
#: edu BAR0 registers: DMA source, destination, count, command (docs/specs/edu.rst).
EDU_DMA_SRC, EDU_DMA_DST, EDU_DMA_CNT, EDU_DMA_CMD = 0x80, 0x88, 0x90, 0x98
EDU_CMD_RUN, EDU_CMD_TO_RAM = 0x1, 0x2
#: How long edu takes for one transfer: a 100 ms timer on the virtual clock.
EDU_DMA_NS = 100_000_000

#: GCMD_REG one-shot bits software must not write back from GSTS (s11.4.4.1): SRTP, SFL,
#: WBF, SIRTP are cleared by the mask 0x96FFFFFF.
GCMD_PERSISTENT = 0x96FF_FFFF
GCMD_SRTP = 1 << 30
GCMD_TE = 1 << 31
#: CCMD_REG: ICC (bit 63) with CIRG=01b (global) in bits 62:61 (s11.4.6).
CCMD_GLOBAL = 1 << 63 | 1 << 61
#: IOTLB_REG: IVT (bit 63) with IIRG=01b (global) in bits 61:60 (s11.4.8.1).
IOTLB_GLOBAL = 1 << 63 | 1 << 60
#: GCMD_REG.QIE / GSTS_REG.QIES: queued invalidation enable (s11.4.4).
GCMD_QIE = 1 << 26
#: IQA_REG: DW (bit 11) selects 256-bit descriptors; QS (bits 2:0) = 0 is a 4 KiB queue
#: (s11.4.9.3).
IQA_DW = 1 << 11


def pci_config_address(bus: int, dev: int, fn: int, reg: int) -> int:
    """CONFIG_ADDRESS for configuration mechanism #1 (PCI Local Bus 3.0 s3.2.2.3.2)."""
    return 0x8000_0000 | bus << 16 | dev << 11 | fn << 8 | (reg & 0xFC)


class EduDevice:
    """QEMU's ``edu`` PCI device (docs/specs/edu.rst) driven over qtest: a DMA engine with a
    4 KiB buffer and no PASID support (its requests carry the source-id of ``bdf``)."""

    def __init__(self, qemu: QtestQemu, bdf: tuple[int, int, int] = EDU_BDF,
                 bar0: int = EDU_BAR0) -> None:
        self.qemu = qemu
        self.bdf = bdf
        self.bar0 = bar0

    @property
    def sid(self) -> int:
        return source_id(*self.bdf)

    def config_read(self, reg: int) -> int:
        self.qemu.outl(0xCF8, pci_config_address(*self.bdf, reg))
        return self.qemu.inl(0xCFC)

    def config_write(self, reg: int, value: int, size: int = 4) -> None:
        self.qemu.outl(0xCF8, pci_config_address(*self.bdf, reg))
        if size == 4:
            self.qemu.outl(0xCFC, value)
        elif size == 2:
            self.qemu.outw(0xCFC + (reg & 2), value)
        else:
            raise UsageError(f"config write of {size} bytes")

    def setup(self) -> None:
        """Check the function is edu, place BAR0 and enable memory space and bus mastering."""
        ident = self.config_read(0)
        if ident != EDU_ID:
            raise VmError(f"PCI {self.bdf} is {ident:#010x}, not edu ({EDU_ID:#010x})")
        self.config_write(0x10, self.bar0)
        self.config_write(0x04, 0x6, size=2)  # COMMAND: memory space | bus master
        if self.qemu.readl(self.bar0) >> 16 != 0x0100:
            raise VmError(f"edu BAR0 at {self.bar0:#x} does not answer with its version")

    def dma(self, access: Access, iova: int, count: int, offset: int = 0,
            timeout: float = 5.0) -> None:
        """One transfer of ``count`` bytes between bus address ``iova`` and the buffer at
        ``offset``: :attr:`Access.READ` reads memory into the buffer, :attr:`Access.WRITE`
        writes the buffer to memory. Returns when the engine is idle again."""
        if access is Access.EXECUTE:
            raise UsageError("edu has no execute requests")
        if count <= 0 or offset < 0 or offset + count > EDU_BUFFER_SIZE:
            raise UsageError(f"{count} bytes at buffer offset {offset:#x} do not fit edu's "
                             f"{EDU_BUFFER_SIZE}-byte buffer")
        buf = EDU_BUFFER + offset
        src, dst = (iova, buf) if access is Access.READ else (buf, iova)
        q = self.qemu
        q.writeq(self.bar0 + EDU_DMA_SRC, src)
        q.writeq(self.bar0 + EDU_DMA_DST, dst)
        q.writeq(self.bar0 + EDU_DMA_CNT, count)
        q.writeq(self.bar0 + EDU_DMA_CMD,
                 EDU_CMD_RUN | (EDU_CMD_TO_RAM if access is Access.WRITE else 0))
        q.clock_step(EDU_DMA_NS)
        deadline = time.monotonic() + timeout
        while q.readq(self.bar0 + EDU_DMA_CMD) & EDU_CMD_RUN:
            if time.monotonic() > deadline:
                raise HvTimeout(f"edu DMA ({access}, {iova:#x}, {count}) did not complete "
                                f"within {timeout:.0f}s")
            q.clock_step(EDU_DMA_NS)


class IntelIommuRegs:
    """The register page of QEMU's ``intel-iommu`` at ``base`` (VT-d 4.x s11.4)."""

    def __init__(self, qemu: QtestQemu, base: int = Q35_DMAR_BASE) -> None:
        self.qemu = qemu
        self.base = base
        self._caps: IommuCaps | None = None

    @property
    def caps(self) -> IommuCaps:
        """CAP_REG and ECAP_REG (read once: they never change)."""
        if self._caps is None:
            self._caps = IommuCaps(self.qemu.readq(self.base + CAP_REG_OFFSET),
                                   self.qemu.readq(self.base + ECAP_REG_OFFSET))
        return self._caps

    @property
    def iotlb_reg(self) -> int:
        """IOTLB_REG's offset: ECAP.IRO*16 + 8 (IVA_REG is at ECAP.IRO*16)."""
        return self.caps.get("IRO") * 16 + 8

    def frcd_offset(self, index: int) -> int:
        """FRCD_REG[index]'s offset: CAP.FRO*16 + index*16 (s11.4.7.6)."""
        return self.caps.get("FRO") * 16 + index * 16

    @property
    def fault_record_count(self) -> int:
        return self.caps.get("NFR") + 1

    def gsts(self) -> int:
        return self.qemu.readl(self.base + GSTS_REG_OFFSET)

    def _wait(self, what: str, done: Callable[[], object]) -> None:
        for _ in range(1000):
            if done():
                return
        raise HvTimeout(f"intel-iommu: {what} did not complete")

    def global_command(self, set_bits: int = 0, clear_bits: int = 0) -> None:
        """Write GCMD_REG from GSTS_REG's persistent bits plus/minus one command (s11.4.4.1)."""
        value = (self.gsts() & GCMD_PERSISTENT | set_bits) & ~clear_bits
        self.qemu.writel(self.base + GCMD_REG_OFFSET, value)

    def set_root(self, rtaddr: int) -> None:
        """Latch RTADDR_REG through GCMD.SRTP and wait for GSTS.RTPS (s11.4.5)."""
        self.qemu.writeq(self.base + RTADDR_REG_OFFSET, rtaddr)
        self.global_command(GCMD_SRTP)
        self._wait("SRTP", lambda: GstsReg.get(self.gsts(), "RTPS"))

    def set_translation(self, enabled: bool) -> None:
        """GCMD.TE and wait for GSTS.TES to follow."""
        if bool(GstsReg.get(self.gsts(), "TES")) == enabled:
            return
        if enabled:
            self.global_command(GCMD_TE)
        else:
            self.global_command(clear_bits=GCMD_TE)
        self._wait("TE", lambda: bool(GstsReg.get(self.gsts(), "TES")) == enabled)

    def invalidate_context_global(self) -> None:
        """Register-based global context-cache invalidation (CCMD_REG; s6.5.1, s11.4.6)."""
        self.qemu.writeq(self.base + CCMD_REG_OFFSET, CCMD_GLOBAL)
        self._wait("CCMD", lambda: not self.qemu.readq(self.base + CCMD_REG_OFFSET) >> 63)

    def invalidate_iotlb_global(self) -> None:
        """Register-based global IOTLB invalidation (IOTLB_REG; s6.5.1, s11.4.8.1)."""
        self.qemu.writeq(self.base + self.iotlb_reg, IOTLB_GLOBAL)
        self._wait("IOTLB", lambda: not self.qemu.readq(self.base + self.iotlb_reg) >> 63)

    def fault_status(self) -> int:
        """FSTS_REG (s11.4.7.1)."""
        return self.qemu.readl(self.base + FSTS_REG_OFFSET)

    def fault_record(self, index: int = 0) -> int:
        """FRCD_REG[index] as one 128-bit value (:class:`FaultRecord`)."""
        off = self.base + self.frcd_offset(index)
        return self.qemu.readq(off) | self.qemu.readq(off + 8) << 64

    def pending_records(self) -> list[int]:
        """Every fault record whose F bit is set."""
        out = []
        for i in range(self.fault_record_count):
            rec = self.fault_record(i)
            if FaultRecord.get(rec, "F"):
                out.append(rec)
        return out

    def clear_faults(self) -> None:
        """Clear every F bit (write 1 to clear) and FSTS.PFO; PPF then drops (s11.4.7)."""
        for i in range(self.fault_record_count):
            off = self.base + self.frcd_offset(i)
            if self.qemu.readq(off + 8) >> 63:
                self.qemu.writeq(off + 8, 1 << 63)
        self.qemu.writel(self.base + FSTS_REG_OFFSET, FstsReg.encode({"PFO": 1}))
        if FstsReg.get(self.fault_status(), "PPF"):
            raise VmError("intel-iommu: FSTS.PPF still set after clearing every fault record")


# --------------------------------------------------------------------------------------------
# Queued invalidation (s6.5.2): the descriptors this suite issues, and the queue
# --------------------------------------------------------------------------------------------


class InvDescType(IntEnum):
    """An invalidation descriptor's type (bits 3:0 and 11:9; s6.5.2)."""

    CONTEXT_CACHE = 1
    IOTLB = 2
    DEVICE_TLB = 3
    INTERRUPT_ENTRY_CACHE = 4
    WAIT = 5
    PASID_IOTLB = 6
    PASID_CACHE = 7


class IotlbInvDesc(VtdStruct):
    """IOTLB Invalidate Descriptor (s6.5.2, type 2), in a 256-bit queue slot. G: 01b
    global, 10b domain-selective, 11b page-selective-within-domain (ADDR, AM, IH). In
    scalable mode a page-selective-within-domain invalidation drops every first-stage and
    nested entry of the domain, whatever its address."""

    NAME = "IOTLB_INV_DSC"
    WIDTH = 256
    FIELDS = (
        BitField("TYPE", 0, 3, "Descriptor type, bits 3:0 (2)"),
        BitField("G", 4, 5, "Granularity"),
        BitField("DW", 6, 6, "Drain writes"),
        BitField("DR", 7, 7, "Drain reads"),
        BitField("TYPE_HI", 9, 11, "Descriptor type, bits 6:4 (0)"),
        BitField("DID", 16, 31, "Domain ID"),
        BitField("AM", 64, 69, "Address mask: 2^AM pages"),
        BitField("IH", 70, 70, "Invalidation hint: leaf entries only"),
        BitField("ADDR", 76, 127, "Input address bits 63:12"),
    )


class PasidIotlbInvDesc(VtdStruct):
    """PASID-based-IOTLB Invalidate Descriptor (s6.5.2, type 6). G: 10b PASID-selective
    within the domain, 11b page-selective-within-PASID (ADDR, AM, IH); it drops first-stage
    and nested entries (and, PASID-selective, second-stage and pass-through ones)."""

    NAME = "P_IOTLB_INV_DSC"
    WIDTH = 256
    FIELDS = (
        BitField("TYPE", 0, 3, "Descriptor type, bits 3:0 (6)"),
        BitField("G", 4, 5, "Granularity"),
        BitField("TYPE_HI", 9, 11, "Descriptor type, bits 6:4 (0)"),
        BitField("DID", 16, 31, "Domain ID"),
        BitField("PASID", 32, 51, "PASID"),
        BitField("AM", 64, 69, "Address mask: 2^AM pages"),
        BitField("IH", 70, 70, "Invalidation hint: leaf entries only"),
        BitField("ADDR", 76, 127, "Input address bits 63:12"),
    )


class PasidCacheInvDesc(VtdStruct):
    """PASID-cache Invalidate Descriptor (s6.5.2, type 7). G: 00b domain-selective, 01b
    PASID-selective within the domain, 11b global. Software issues it after changing a PASID
    entry (then a PASID-based-IOTLB invalidation), without any context-cache invalidation."""

    NAME = "PC_INV_DSC"
    WIDTH = 256
    FIELDS = (
        BitField("TYPE", 0, 3, "Descriptor type, bits 3:0 (7)"),
        BitField("G", 4, 5, "Granularity"),
        BitField("TYPE_HI", 9, 11, "Descriptor type, bits 6:4 (0)"),
        BitField("DID", 16, 31, "Domain ID"),
        BitField("PASID", 32, 51, "PASID"),
    )


class InvWaitDesc(VtdStruct):
    """Invalidation Wait Descriptor (s6.5.2, type 5): with SW, hardware writes STATUS_DATA
    to STATUS_ADDR once every earlier descriptor has completed."""

    NAME = "INV_WAIT_DSC"
    WIDTH = 256
    FIELDS = (
        BitField("TYPE", 0, 3, "Descriptor type, bits 3:0 (5)"),
        BitField("IF", 4, 4, "Interrupt flag: a completion event"),
        BitField("SW", 5, 5, "Status write"),
        BitField("FN", 6, 6, "Fence: later descriptors wait for this one"),
        BitField("PD", 7, 7, "Page-request drain"),
        BitField("TYPE_HI", 9, 11, "Descriptor type, bits 6:4 (0)"),
        BitField("STATUS_DATA", 32, 63, "Written to STATUS_ADDR"),
        BitField("STATUS_ADDR", 66, 127, "Status address bits 63:2"),
    )


#: The descriptors above, for round-trip tests.
INV_DESCRIPTORS: tuple[type[VtdStruct], ...] = (
    IotlbInvDesc, PasidIotlbInvDesc, PasidCacheInvDesc, InvWaitDesc)


class InvalidationQueue:
    """The queued-invalidation interface of a remapping unit (s6.5.2, registers s11.4.9).

    The queue is one 4 KiB page of guest RAM at ``base``: 128 256-bit descriptors
    (IQA_REG.DW=1, QS=0; scalable mode's PASID descriptors need the 256-bit format).
    :meth:`submit` appends descriptors and an Invalidation Wait Descriptor that writes a new
    token to the dword at ``status``, moves IQT_REG and waits for the token and IQH_REG =
    IQT_REG. While the queue is enabled the unit refuses register-based invalidation
    (CCMD_REG, IOTLB_REG): :meth:`disable` (or leaving :meth:`enabled`) brings it back.
    """

    SLOTS = 128
    SLOT = 32

    def __init__(self, regs: IntelIommuRegs, base: int, status: int) -> None:
        if base & 0xFFF or status & 3 or base <= status < base + 0x1000:
            raise UsageError(f"queue {base:#x} must be 4 KiB aligned and status {status:#x} "
                             "a dword outside it")
        self.regs = regs
        self.qemu = regs.qemu
        self.base = base
        self.status = status
        self.tail = 0
        self.token = 0

    def _reg64(self, offset: int) -> int:
        return self.qemu.readq(self.regs.base + offset)

    def _until(self, what: str, done: Callable[[], bool]) -> None:
        for _ in range(1000):
            if done():
                return
        raise HvTimeout(f"intel-iommu: {what} did not take effect (GSTS {self.regs.gsts():#x})")

    def enabled_status(self) -> bool:
        """GSTS.QIES."""
        return bool(GstsReg.get(self.regs.gsts(), "QIES"))

    def enable(self) -> None:
        """IQT_REG = 0 and IQA_REG (base, DW=1, QS=0) while disabled, then GCMD.QIE and wait
        for GSTS.QIES (s6.5.2, s11.4.4.1)."""
        if self.enabled_status():
            raise VmError("intel-iommu: queued invalidation is already enabled")
        self.qemu.writeq(self.regs.base + IQT_REG_OFFSET, 0)
        self.qemu.writeq(self.regs.base + IQA_REG_OFFSET, self.base | IQA_DW)
        self.qemu.memset(self.base, 0x1000)
        self.tail = 0
        self.regs.global_command(GCMD_QIE)
        self._until("QIE", self.enabled_status)

    def disable(self) -> None:
        """GCMD.QIE=0 and wait for GSTS.QIES to clear (the queue must be idle: QEMU also wants
        the last descriptor to have been a wait descriptor, which :meth:`submit` ensures)."""
        self.regs.global_command(clear_bits=GCMD_QIE)
        self._until("QIE off", lambda: not self.enabled_status())

    @contextmanager
    def enabled(self) -> Iterator[InvalidationQueue]:
        """The queue enabled for the duration, register-based invalidation afterwards."""
        self.enable()
        try:
            yield self
        finally:
            self.disable()

    def submit(self, *descriptors: int) -> None:
        """Queue ``descriptors`` (256-bit values) and a status-writing wait descriptor, move
        IQT_REG and wait until the unit has processed them all. Raises :class:`VmError` with
        IQH_REG and the descriptor there on an invalidation queue error (FSTS.IQE)."""
        self.token = (self.token + 1) & 0xFFFF_FFFF or 1
        wait = InvWaitDesc.encode({"TYPE": InvDescType.WAIT, "SW": 1, "FN": 1,
                                   "STATUS_DATA": self.token,
                                   "STATUS_ADDR": self.status >> 2})
        batch = [*descriptors, wait]
        if len(batch) >= self.SLOTS:
            raise UsageError(f"{len(batch)} descriptors do not fit a {self.SLOTS}-slot queue")
        self.qemu.writel(self.status, 0)
        for desc in batch:
            self.qemu.memwrite(self.base + self.tail * self.SLOT,
                               desc.to_bytes(self.SLOT, "little"))
            self.tail = (self.tail + 1) % self.SLOTS
        self.qemu.writeq(self.regs.base + IQT_REG_OFFSET, self.tail << 5)
        deadline = time.monotonic() + 5.0
        while self.qemu.readl(self.status) != self.token \
                or self._reg64(IQH_REG_OFFSET) != self.tail << 5:
            if FstsReg.get(self.regs.fault_status(), "IQE"):
                head = self._reg64(IQH_REG_OFFSET) >> 5
                bad = int.from_bytes(self.qemu.memread(self.base + head * self.SLOT,
                                                       self.SLOT), "little")
                raise VmError(f"intel-iommu: invalidation queue error at IQH slot {head} "
                              f"(descriptor {bad:#066x})")
            if time.monotonic() > deadline:
                raise HvTimeout(f"intel-iommu: invalidation queue stuck at IQH "
                                f"{self._reg64(IQH_REG_OFFSET):#x}, IQT {self.tail << 5:#x}")
            self.qemu.clock_step()


@dataclass(frozen=True)
class DmaResult:
    """What the remapping unit showed after one DMA: FSTS_REG and the pending records."""

    fault_status: int
    records: tuple[int, ...]

    @property
    def faulted(self) -> bool:
        return bool(FstsReg.get(self.fault_status, "PPF")) or bool(self.records)

    def decoded(self) -> list[dict[str, int]]:
        return [FaultRecord.decode(r) for r in self.records]


class QtestIommuBench:
    """What every qtest bench with QEMU's intel-iommu shares: start (the subclass's
    :meth:`_setup`, closing QEMU if it fails), close, the context-manager protocol and the
    remapping unit's programming. Subclasses set :attr:`qemu` and :attr:`iommu`."""

    qemu: QtestQemu
    iommu: IntelIommuRegs

    def _setup(self) -> None:
        """Set the machine up once QEMU runs (devices, pending faults)."""

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> Self:
        self.qemu.start()
        try:
            self._setup()
        except BaseException:
            self.qemu.close()
            raise
        return self

    def close(self) -> int | None:
        return self.qemu.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @property
    def caps(self) -> IommuCaps:
        return self.iommu.caps

    # -- programming ------------------------------------------------------------------------

    def program(self, rtaddr: int) -> None:
        """Make ``rtaddr`` the live root table and forget everything cached: SRTP, global
        context-cache and IOTLB invalidation (s6.5.1), then TE=1 and no pending fault."""
        self.iommu.set_root(rtaddr)
        self.invalidate()
        self.iommu.set_translation(True)
        self.iommu.clear_faults()

    def invalidate(self) -> None:
        """Global context-cache and IOTLB invalidation (after tables changed)."""
        self.iommu.invalidate_context_global()
        self.iommu.invalidate_iotlb_global()

    @contextmanager
    def untranslated(self) -> Iterator[None]:
        """Translation off (TE=0) for the duration: DMA addresses are GPAs. TE goes back to
        what it was, and QEMU drops its caches on both switches."""
        was_on = bool(GstsReg.get(self.iommu.gsts(), "TES"))
        self.iommu.set_translation(False)
        try:
            yield
        finally:
            if was_on:
                self.iommu.set_translation(True)


class VtdQtestBench(QtestIommuBench):
    """A q35 QEMU with ``intel-iommu,<iommu_props>`` and ``edu`` at ``edu_bdf`` under qtest.

    ``staging`` is a 4 KiB RAM page the bench keeps for itself (edu buffer transfers); the
    tables and DMA targets of a test go anywhere else in RAM.
    """

    def __init__(self, iommu_props: Sequence[str] = (), *, memory_mib: int = 256,
                 edu_bdf: tuple[int, int, int] = EDU_BDF, staging: int = 0x80_0000,
                 name: str = "vtd-qtest") -> None:
        self.iommu_props = list(iommu_props)
        bus, dev, fn = edu_bdf
        if bus != 0:
            raise UsageError("edu must sit on the root bus (no bridge is set up under qtest)")
        iommu = ",".join(["intel-iommu", *self.iommu_props])
        # The IOMMU must be created before the devices behind it; edu's own default DMA mask
        # is 28 bits, far short of the IOVAs a test uses.
        args = ["-device", iommu,
                "-device", f"edu,addr={dev:02x}.{fn},dma_mask={(1 << 64) - 1:#x}"]
        self.qemu = QtestQemu(args, memory_mib=memory_mib, name=name)
        regions = [(r.gpa, r.size) for r in q35_ram_layout(memory_mib << 20)]
        self.memory = QtestMemory(self.qemu, regions)
        self.iommu = IntelIommuRegs(self.qemu)
        self.edu = EduDevice(self.qemu, edu_bdf)
        if not self.memory.contains(staging, EDU_BUFFER_SIZE):
            raise UsageError(f"staging page {staging:#x} is not in RAM")
        self.staging = staging

    def _setup(self) -> None:
        self.edu.setup()
        self.iommu.clear_faults()

    def load_buffer(self, data: bytes, offset: int = 0) -> None:
        """Put ``data`` into edu's buffer at ``offset`` (an untranslated DMA read)."""
        self.memory.write(self.staging + offset, data)
        with self.untranslated():
            self.edu.dma(Access.READ, self.staging + offset, len(data), offset)

    def dump_buffer(self, count: int, offset: int = 0) -> bytes:
        """``count`` bytes of edu's buffer at ``offset`` (an untranslated DMA write)."""
        self.memory.fill(self.staging + offset, count, 0)
        with self.untranslated():
            self.edu.dma(Access.WRITE, self.staging + offset, count, offset)
        return self.memory.read(self.staging + offset, count)

    # -- DMA --------------------------------------------------------------------------------

    def dma(self, request: DmaRequest, count: int, offset: int = 0, *,
            invalidate: bool = True) -> DmaResult:
        """Run ``request`` (``count`` bytes from its address) through edu and the unit.

        The request must be edu's (its source-id, no PASID, read or write). With
        ``invalidate`` the IOTLB and context cache are flushed first, so QEMU walks the tables
        as they are now. Returns FSTS and the pending fault records; the caller clears them.
        """
        if request.sid != self.edu.sid:
            raise UsageError(f"edu issues requests as {self.edu.sid:#06x}, not "
                             f"{request.sid:#06x}")
        if request.pasid is not None or request.privileged:
            raise UsageError("edu's requests carry no PASID and no privilege")
        if invalidate:
            self.invalidate()
        self.edu.dma(request.access, request.address, count, offset)
        return DmaResult(self.iommu.fault_status(), tuple(self.iommu.pending_records()))
