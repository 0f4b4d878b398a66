"""A live guest's vIOMMU: its registers through the monitor, its tables in the guest's RAM.

The remapping unit's registers (VT-d 4.x s11.4) are read with the monitor's ``xp`` at the q35
DMAR base: VER_REG (0x00), CAP_REG/ECAP_REG (0x08/0x10, s11.4.2-3), GSTS_REG (0x1C, s11.4.4.2:
TES, RTPS), RTADDR_REG (0x20, s11.4.5), FSTS_REG (0x34, s11.4.7.1) and the fault recording
registers at CAP.FRO (s11.4.7.6). The translation structures the guest kernel programmed
(root, context, PASID and paging tables, ch. 9) are then walked by the pure model
(:mod:`hvtools.iommu.walk`) straight from the VM's shared RAM file.

RTADDR_REG reads back the value last written, while the unit walks from the one latched by the
last SRTP command (s11.4.4.1, GSTS.RTPS); the two differ only while a guest has written the
register without latching it yet.

A running guest maps and unmaps DMA buffers all the time; :func:`paused` (QMP ``stop`` and
``cont``) holds it still for a consistent view.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from hvtools.addr import PAGE_4K, Iova
from hvtools.control.driver import Driver
from hvtools.control.mmu_live import open_ram
from hvtools.errors import StateError, UsageError, VmError
from hvtools.iommu.regs import CAP_REG_OFFSET, Q35_DMAR_BASE, IommuCaps, parse_xp_quadwords
from hvtools.iommu.structures import (
    FSTS_REG_OFFSET,
    GSTS_REG_OFFSET,
    RTADDR_REG_OFFSET,
    ContextEntry,
    FaultRecord,
    FstsReg,
    GstsReg,
    PasidTableEntry,
    Pgtt,
    RtaddrReg,
    ScalableContextEntry,
    TranslationType,
    Ttm,
)
from hvtools.iommu.walk import (
    Access,
    DeviceTables,
    DmaRequest,
    FaultReason,
    dump_tables,
    format_source_id,
    is_recorded,
    qemu_reason,
    translate,
)
from hvtools.memory.ramfile import RamFile
from hvtools.translation import Fault, Outcome, Permissions, Translation, WalkStep

#: VER_REG, version register at offset 0 (s11.4.1).
VER_REG_OFFSET = 0x00
#: Fault recording registers read at most (CAP.NFR allows 256).
MAX_FAULT_RECORDS = 256


# --------------------------------------------------------------------------------------------
# Registers
# --------------------------------------------------------------------------------------------


def fault_reason_name(code: int) -> str:
    """The model's name of a VT-d fault reason code (s7.1.3), or ``UNKNOWN_0xNN``."""
    try:
        return FaultReason(code).name
    except ValueError:
        return f"UNKNOWN_{code:#04x}"


@dataclass(frozen=True)
class FaultRecordReg:
    """One fault recording register FRCD_REG[n] (s11.4.7.6), 128 bits as read."""

    index: int
    address: int  # MMIO address of the register
    value: int

    @property
    def fields(self) -> dict[str, int]:
        return FaultRecord.decode(self.value)

    @property
    def pending(self) -> bool:
        """F=1: the record holds a fault software has not cleared."""
        return bool(FaultRecord.get(self.value, "F"))

    def to_json(self) -> dict[str, Any]:
        f = self.fields
        out: dict[str, Any] = {"index": self.index, "address": f"{self.address:#x}",
                               "value": f"{self.value:#034x}", "pending": self.pending}
        if self.pending:
            write = not f["T1"] and not f["T2"]
            out.update({
                "sid": format_source_id(f["SID"]), "page": f"{f['FI'] << 12:#x}",
                "reason": f["FR"], "name": fault_reason_name(f["FR"]),
                "access": "write" if write else "read",
                "pasid": f["PV"] if f["PP"] else None})
        return out


@dataclass(frozen=True)
class VtdRegisters:
    """The registers of one remapping unit that translation depends on, as read over MMIO."""

    base: int
    version: int
    caps: IommuCaps
    gsts: int
    rtaddr: int
    fsts: int
    fault_records: tuple[FaultRecordReg, ...] = ()

    @property
    def translation_enabled(self) -> bool:
        """GSTS.TES (s11.4.4.2): with TES=0 the unit passes DMA through untranslated."""
        return bool(GstsReg.get(self.gsts, "TES"))

    @property
    def root_table_set(self) -> bool:
        """GSTS.RTPS: a root table pointer has been latched (SRTP, s11.4.4.1)."""
        return bool(GstsReg.get(self.gsts, "RTPS"))

    @property
    def ttm(self) -> int:
        return RtaddrReg.get(self.rtaddr, "TTM")

    @property
    def mode(self) -> str:
        """``legacy``, ``scalable``, ``abort-dma`` or ``reserved`` (RTADDR_REG.TTM, s11.4.5)."""
        return {Ttm.LEGACY: "legacy", Ttm.SCALABLE: "scalable",
                Ttm.ABORT_DMA: "abort-dma"}.get(Ttm(self.ttm), "reserved")

    @property
    def root_table(self) -> int:
        return RtaddrReg.get(self.rtaddr, "RTA") << 12

    @property
    def pending_faults(self) -> tuple[FaultRecordReg, ...]:
        return tuple(r for r in self.fault_records if r.pending)

    def to_json(self) -> dict[str, Any]:
        return {
            "base": f"{self.base:#x}", "version": f"{self.version >> 4 & 0xF}.{self.version & 0xF}",
            "cap": f"{self.caps.cap:#018x}", "ecap": f"{self.caps.ecap:#018x}",
            "gsts": f"{self.gsts:#010x}", "GSTS": GstsReg.decode(self.gsts),
            "rtaddr": f"{self.rtaddr:#018x}", "mode": self.mode,
            "root_table": f"{self.root_table:#x}",
            "translation_enabled": self.translation_enabled,
            "root_table_set": self.root_table_set,
            "fsts": f"{self.fsts:#010x}", "FSTS": FstsReg.decode(self.fsts),
            "fault_records": [r.to_json() for r in self.fault_records],
        }


def _xp(driver: Driver, name: str, addr: int, count: int, unit: str) -> list[int]:
    """``count`` words (``g`` 64-bit, ``w`` 32-bit) of guest-physical ``addr`` via ``xp``."""
    text = driver.hmp(name, f"xp /{count}{unit}x {addr:#x}")
    words = parse_xp_quadwords(text)
    if len(words) != count:
        raise VmError(f"VM {name!r}: cannot read the VT-d register at {addr:#x} through the "
                      f"monitor: {text.strip()[:160]!r}")
    return words


def read_registers(driver: Driver, name: str, *, base: int = Q35_DMAR_BASE) -> VtdRegisters:
    """Read the unit's registers through the monitor (the VM must have a vIOMMU)."""
    vm = driver.info(name)
    if vm.spec.iommu is None:
        raise StateError(f"VM {name!r} has no vIOMMU (started with --iommu none)")
    version = _xp(driver, name, base + VER_REG_OFFSET, 1, "w")[0]
    cap, ecap = _xp(driver, name, base + CAP_REG_OFFSET, 2, "g")
    caps = IommuCaps(cap, ecap)
    gsts = _xp(driver, name, base + GSTS_REG_OFFSET, 1, "w")[0]
    rtaddr = _xp(driver, name, base + RTADDR_REG_OFFSET, 1, "g")[0]
    fsts = _xp(driver, name, base + FSTS_REG_OFFSET, 1, "w")[0]
    fro = base + caps.get("FRO") * 16
    records = []
    for i in range(min(caps.get("NFR") + 1, MAX_FAULT_RECORDS)):
        lo, hi = _xp(driver, name, fro + 16 * i, 2, "g")
        records.append(FaultRecordReg(i, fro + 16 * i, lo | hi << 64))
    return VtdRegisters(base=base, version=version, caps=caps, gsts=gsts, rtaddr=rtaddr,
                        fsts=fsts, fault_records=tuple(records))


@contextlib.contextmanager
def paused(driver: Driver, name: str, enabled: bool = True) -> Iterator[bool]:
    """Hold the VM stopped for the block (QMP ``stop``/``cont``) when ``enabled`` and it runs.

    Yields whether it stopped the VM; a VM that was already paused stays paused.
    """
    if not enabled or driver.qmp(name, "query-status").get("status") != "running":
        yield False
        return
    driver.qmp(name, "stop")
    try:
        yield True
    finally:
        driver.qmp(name, "cont")


@dataclass
class LiveIommu:
    """A live vIOMMU: its registers and the guest memory holding its tables."""

    registers: VtdRegisters
    memory: RamFile

    def close(self) -> None:
        self.memory.close()

    def __enter__(self) -> LiveIommu:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def attach(driver: Driver, name: str, *, base: int = Q35_DMAR_BASE) -> LiveIommu:
    """Read the registers and map the VM's RAM (read-only). Stop the VM first for a stable
    view: a running guest edits its tables under the walk."""
    registers = read_registers(driver, name, base=base)
    return LiveIommu(registers=registers, memory=open_ram(driver, name))


# --------------------------------------------------------------------------------------------
# Translate one request
# --------------------------------------------------------------------------------------------


def _perms_json(p: Permissions) -> dict[str, bool]:
    return {"read": p.read, "write": p.write, "execute": p.execute, "user": p.user}


def step_json(s: WalkStep) -> dict[str, Any]:
    d: dict[str, Any] = {"stage": str(s.stage), "level": s.level, "table": s.table,
                         "address": f"{s.address:#x}", "entry": f"{s.entry:#x}"}
    if s.write_back is not None:
        d["write_back"] = f"{s.write_back:#x}"
    return d


@dataclass(frozen=True)
class LiveTranslation:
    """One DMA request translated against the live unit's registers and tables."""

    vm: str
    request: DmaRequest
    registers: VtdRegisters
    outcome: Outcome

    @property
    def translation_enabled(self) -> bool:
        return self.registers.translation_enabled

    @property
    def fault_name(self) -> str | None:
        o = self.outcome
        return fault_reason_name(o.code) if isinstance(o, Fault) else None

    def to_json(self, *, steps: bool = False) -> dict[str, Any]:
        o, req = self.outcome, self.request
        d: dict[str, Any] = {
            "vm": self.vm, "sid": format_source_id(req.sid), "pasid": req.pasid,
            "iova": f"{req.address:#x}", "access": str(req.access),
            "mode": self.registers.mode, "rtaddr": f"{self.registers.rtaddr:#x}",
            "translation_enabled": self.translation_enabled,
            "gpa": f"{o.output:#x}" if isinstance(o, Translation) else None,
            "page_size": o.page_size if isinstance(o, Translation) else None,
            "permissions": _perms_json(o.permissions) if isinstance(o, Translation) else None,
            "fault": None,
        }
        if isinstance(o, Fault):
            qemu = qemu_reason(o, req)
            d["fault"] = {"code": o.code, "name": fault_reason_name(o.code),
                          "reason": o.reason, "stage": str(o.stage), "level": o.level,
                          "recorded": is_recorded(o),
                          "qemu_code": None if qemu is None else int(qemu)}
        if steps:
            d["steps"] = [step_json(s) for s in o.steps]
        return d


def translate_on(iommu: LiveIommu, request: DmaRequest) -> Outcome:
    """The model's outcome for ``request`` on an attached unit. With GSTS.TES=0 the unit does
    not remap (s11.4.4.2): the request passes through with its own address."""
    regs = iommu.registers
    if not regs.translation_enabled:
        return Translation(input=request.address, output=request.address, page_size=PAGE_4K,
                           permissions=Permissions(read=True, write=True, execute=True,
                                                   user=True))
    return translate(request, iommu.memory, regs.rtaddr, regs.caps)


def translate_live(driver: Driver, name: str, sid: int, pasid: int | None, iova: int,
                   write: bool, *, pause: bool = False, base: int = Q35_DMAR_BASE
                   ) -> LiveTranslation:
    """Translate an untranslated DMA request of ``sid`` (with ``pasid`` or none) for ``iova``
    through the tables the guest programmed. ``pause`` stops the VM while reading."""
    if not 0 <= iova < 1 << 64:
        raise UsageError(f"IOVA {iova:#x} is not a 64-bit address")
    request = DmaRequest(sid, Iova(iova), Access.WRITE if write else Access.READ, pasid)
    with paused(driver, name, pause), attach(driver, name, base=base) as iommu:
        outcome = translate_on(iommu, request)
    return LiveTranslation(vm=name, request=request, registers=iommu.registers,
                           outcome=outcome)


# --------------------------------------------------------------------------------------------
# Every device's entries
# --------------------------------------------------------------------------------------------


def _field_json(fields: dict[str, int], addresses: tuple[str, ...]) -> dict[str, Any]:
    """Decoded fields, with page-frame fields shown as the address they hold."""
    return {k: (f"{v << 12:#x}" if k in addresses else v) for k, v in fields.items()
            if not k.startswith("IGN_")}


_PGTT_NAMES = {Pgtt.FIRST_STAGE: "first-stage", Pgtt.SECOND_STAGE: "second-stage",
               Pgtt.NESTED: "nested", Pgtt.PASS_THROUGH: "pass-through"}
_TT_NAMES = {TranslationType.UNTRANSLATED: "untranslated", TranslationType.ALL: "all",
             TranslationType.PASS_THROUGH: "pass-through", TranslationType.RESERVED: "reserved"}


def pgtt_name(pgtt: int) -> str:
    """PASID-table-entry PGTT as words (s9.6)."""
    try:
        return _PGTT_NAMES[Pgtt(pgtt)]
    except (ValueError, KeyError):
        return f"reserved({pgtt:#b})"


@dataclass(frozen=True)
class PasidEntryView:
    """One present scalable-mode PASID-table entry of a device (s9.6)."""

    pasid: int
    address: int
    value: int

    @property
    def fields(self) -> dict[str, int]:
        return PasidTableEntry.decode(self.value)

    @property
    def pgtt(self) -> str:
        return pgtt_name(self.fields["PGTT"])

    def to_json(self) -> dict[str, Any]:
        return {"pasid": self.pasid, "address": f"{self.address:#x}",
                "entry": f"{self.value:#0130x}", "pgtt": self.pgtt,
                "fields": _field_json(self.fields, ("SSPTPTR", "FSPTPTR"))}


@dataclass(frozen=True)
class DeviceView:
    """A device's present context entry (and its PASID entries in scalable mode)."""

    tables: DeviceTables

    @property
    def sid(self) -> int:
        return self.tables.sid

    @property
    def pasid_entries(self) -> tuple[PasidEntryView, ...]:
        return tuple(PasidEntryView(p, a, v) for p, a, v in self.tables.pasid_entries)

    def to_json(self) -> dict[str, Any]:
        t = self.tables
        fields = t.context_fields
        addresses = ("PASIDDIRPTR",) if t.scalable else ("SSPTPTR",)
        out: dict[str, Any] = {
            "sid": format_source_id(t.sid), "context_address": f"{t.context_address:#x}",
            "context": f"{t.context:#0{(66 if t.scalable else 34)}x}",
            "format": (ScalableContextEntry if t.scalable else ContextEntry).NAME,
            "fields": _field_json(fields, addresses),
            "pasid_entries": [p.to_json() for p in self.pasid_entries],
            "errors": list(t.errors),
        }
        if not t.scalable:
            out["translation_type"] = _TT_NAMES[TranslationType(fields["TT"])]
        return out


@dataclass(frozen=True)
class LiveTables:
    """Every device the guest programmed into the unit's root table."""

    vm: str
    registers: VtdRegisters
    devices: tuple[DeviceView, ...] = field(default_factory=tuple)

    def device(self, sid: int) -> DeviceView | None:
        return next((d for d in self.devices if d.sid == sid), None)

    def to_json(self) -> dict[str, Any]:
        return {"vm": self.vm, "registers": self.registers.to_json(),
                "devices": [d.to_json() for d in self.devices]}


def tables_on(iommu: LiveIommu, *, max_pasid_entries: int = 1 << 12) -> tuple[DeviceView, ...]:
    """Every present context entry under the unit's RTADDR and, in scalable mode, every
    present PASID-table entry (s9.1-s9.6), from an attached unit."""
    regs = iommu.registers
    if regs.mode not in ("legacy", "scalable"):
        return ()
    return tuple(DeviceView(t) for t in dump_tables(iommu.memory, regs.rtaddr, regs.caps,
                                                    max_pasid_entries))


def tables_live(driver: Driver, name: str, *, pause: bool = False,
                base: int = Q35_DMAR_BASE, max_pasid_entries: int = 1 << 12) -> LiveTables:
    """Every device's context entry and PASID entries as the guest programmed them. With
    RTPS=0 (no root table latched yet) there are none. ``pause`` stops the VM while reading."""
    with paused(driver, name, pause), attach(driver, name, base=base) as iommu:
        regs = iommu.registers
        devices = tables_on(iommu, max_pasid_entries=max_pasid_entries) \
            if regs.root_table_set else ()
    return LiveTables(vm=name, registers=regs, devices=devices)

