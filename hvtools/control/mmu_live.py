"""A live vCPU's paging state and guest memory, for the x86 paging model.

Control registers come from the monitor (``info registers``, which syncs the vCPU state first),
MAXPHYADDR and 1-GByte-page support from the CPU object's QOM properties (``phys-bits``,
``pdpe1gb``: what the guest's CPUID reports; QEMU's TCG CPUs default to 40 physical-address
bits) with the guest's ``/proc/cpuinfo`` through the agent as a fallback, and guest memory from
the VM's shared RAM file (:class:`~hvtools.memory.ramfile.RamFile`).

PKRU and IA32_PKRS are not in ``info registers``; the mode carries 0 for both (no key denies
anything), so protection-key checks need the caller to supply them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hvtools.addr import Gva
from hvtools.control.driver import Driver
from hvtools.errors import AgentError, HvError, StateError, UsageError, VmError
from hvtools.memory.ramfile import PmemDump, RamFile, q35_ram_layout
from hvtools.mmu.paging import PagingMode

#: What ``info registers`` prints per vCPU (QEMU target/i386/cpu-dump.c), "KEY=hexvalue".
_REG_RE = re.compile(r"\b(RIP|EIP|RSP|ESP|RFL|EFL|CPL|HLT|CR0|CR2|CR3|CR4|EFER)=([0-9a-fA-F]+)")
_CPU_RE = re.compile(r"^CPU#(\d+)\s*$", re.MULTILINE)
_ADDRESS_SIZES_RE = re.compile(r"address sizes\s*:\s*(\d+) bits physical")


@dataclass(frozen=True)
class VcpuState:
    """The registers of one vCPU that paging depends on, as the monitor printed them."""

    index: int
    cr0: int
    cr2: int
    cr3: int
    cr4: int
    efer: int
    rip: int
    rsp: int
    rflags: int
    cpl: int
    halted: bool

    def to_json(self) -> dict[str, Any]:
        return {"cpu": self.index, "cr0": f"{self.cr0:#x}", "cr2": f"{self.cr2:#x}",
                "cr3": f"{self.cr3:#x}", "cr4": f"{self.cr4:#x}", "efer": f"{self.efer:#x}",
                "rip": f"{self.rip:#x}", "rsp": f"{self.rsp:#x}",
                "rflags": f"{self.rflags:#x}", "cpl": self.cpl, "halted": self.halted}


def parse_info_registers(text: str) -> list[VcpuState]:
    """Parse ``info registers`` (one vCPU) or ``info registers -a`` output.

    Tolerates CRLF line ends, the 32-bit layout (EIP/ESP/EFL) and extra lines; a block
    missing one of the needed registers is an error naming it.
    """
    text = text.replace("\r", "")
    marks = list(_CPU_RE.finditer(text))
    if not marks:
        blocks = [(0, text)]
    else:
        blocks = [(int(m.group(1)), text[m.end():marks[i + 1].start() if i + 1 < len(marks)
                                          else len(text)]) for i, m in enumerate(marks)]
    states = []
    for index, block in blocks:
        regs: dict[str, int] = {}
        for key, value in _REG_RE.findall(block):
            key = {"EIP": "RIP", "ESP": "RSP", "EFL": "RFL"}.get(key, key)
            regs.setdefault(key, int(value, 16))
        missing = [k for k in ("CR0", "CR3", "CR4", "EFER") if k not in regs]
        if missing:
            first = block.strip().splitlines()[0] if block.strip() else "empty output"
            raise VmError(f"cannot read {', '.join(missing)} of vCPU {index} from "
                          f"'info registers' ({first})")
        states.append(VcpuState(
            index=index, cr0=regs["CR0"], cr2=regs.get("CR2", 0), cr3=regs["CR3"],
            cr4=regs["CR4"], efer=regs["EFER"], rip=regs.get("RIP", 0),
            rsp=regs.get("RSP", 0), rflags=regs.get("RFL", 0), cpl=regs.get("CPL", 0),
            halted=bool(regs.get("HLT", 0))))
    return states


def read_vcpu(driver: Driver, name: str, cpu: int = 0) -> VcpuState:
    """One vCPU's registers (``info registers N``)."""
    if cpu < 0:
        raise UsageError(f"vCPU index {cpu} is negative")
    text = driver.hmp(name, f"info registers {cpu}")
    if "not available" in text:
        raise UsageError(f"VM {name!r} has no vCPU {cpu}")
    return parse_info_registers(text)[0]


def read_vcpus(driver: Driver, name: str) -> list[VcpuState]:
    """Every vCPU's registers (``info registers -a``)."""
    return parse_info_registers(driver.hmp(name, "info registers -a"))


@dataclass(frozen=True)
class CpuFeatures:
    """CPUID facts the paging model needs, and where they came from."""

    maxphyaddr: int
    page_1g: bool
    source: str  # "qom" or "guest-cpuinfo"


def _cpu_qom_path(driver: Driver, name: str, cpu: int) -> str:
    cpus = driver.qmp(name, "query-cpus-fast")
    for c in cpus:
        if c.get("cpu-index") == cpu:
            return str(c["qom-path"])
    raise UsageError(f"VM {name!r} has no vCPU {cpu} (query-cpus-fast lists "
                     f"{[c.get('cpu-index') for c in cpus]})")


def read_cpu_features(driver: Driver, name: str, cpu: int = 0) -> CpuFeatures:
    """MAXPHYADDR and Page1GB of a vCPU: its QOM ``phys-bits``/``pdpe1gb``, else the guest's."""
    try:
        path = _cpu_qom_path(driver, name, cpu)
        bits = driver.qmp(name, "qom-get", {"path": path, "property": "phys-bits"})
        gb = driver.qmp(name, "qom-get", {"path": path, "property": "pdpe1gb"})
        if isinstance(bits, int) and bits > 0:
            return CpuFeatures(maxphyaddr=bits, page_1g=bool(gb), source="qom")
    except UsageError:
        raise
    except HvError:
        pass
    try:
        res = driver.exec(name, ["cat", "/proc/cpuinfo"], timeout=10.0)
    except (AgentError, HvError, OSError) as err:
        raise VmError(f"cannot learn MAXPHYADDR of VM {name!r}: neither QOM phys-bits nor "
                      f"the guest agent answered ({err})") from err
    text = res.stdout.decode(errors="replace")
    m = _ADDRESS_SIZES_RE.search(text)
    if m is None:
        raise VmError(f"cannot learn MAXPHYADDR of VM {name!r}: no 'address sizes' in "
                      "the guest's /proc/cpuinfo")
    return CpuFeatures(maxphyaddr=int(m.group(1)), page_1g=" pdpe1gb" in text,
                       source="guest-cpuinfo")


def paging_mode(vcpu: VcpuState, features: CpuFeatures) -> PagingMode:
    """The model's mode for a vCPU (UsageError unless it uses 4- or 5-level paging)."""
    try:
        return PagingMode.from_registers(cr0=vcpu.cr0, cr4=vcpu.cr4, efer=vcpu.efer,
                                         maxphyaddr=features.maxphyaddr,
                                         page_1g=features.page_1g)
    except UsageError as err:
        raise StateError(f"vCPU {vcpu.index}: {err}") from err


def ram_path(driver: Driver, name: str) -> Path:
    """The VM's shared RAM file, wherever its driver keeps it."""
    from hvtools.control.qemu_driver import QemuDriver
    from hvtools.control.qemu_driver import ram_path as qemu_ram_path

    if isinstance(driver, QemuDriver):
        return qemu_ram_path(name)
    getter = getattr(driver, "ram_path", None)
    if callable(getter):
        return Path(getter(name))
    raise UsageError(f"the {driver.name} driver has no shared RAM file")


def open_ram(driver: Driver, name: str, *, writable: bool = False) -> RamFile:
    """The running VM's RAM, mapped zero-copy with the q35 layout (read-only by default)."""
    vm = driver.info(name)
    if not vm.state.active:
        raise StateError(f"VM {name!r} is {vm.state}; it must be running "
                         f"(hvtools vm start {name})")
    path = ram_path(driver, name)
    if not path.exists():
        raise VmError(f"VM {name!r}'s RAM file {path} does not exist")
    return RamFile(path, ram_size=vm.spec.memory, writable=writable)


@dataclass(frozen=True)
class LiveTarget:
    """Everything a walk of a live vCPU needs: its registers, mode and the guest memory."""

    vcpu: VcpuState
    features: CpuFeatures
    mode: PagingMode
    memory: RamFile

    @property
    def cr3(self) -> int:
        return self.vcpu.cr3

    def close(self) -> None:
        self.memory.close()


def attach(driver: Driver, name: str, cpu: int = 0, *, writable: bool = False,
           pkru: int = 0, pkrs: int = 0) -> LiveTarget:
    """Read vCPU ``cpu``'s paging state and map the VM's RAM. Stop the VM first for a stable
    view (QMP ``stop``): a running guest may switch CR3 or edit its tables under the walk."""
    vcpu = read_vcpu(driver, name, cpu)
    features = read_cpu_features(driver, name, cpu)
    mode = replace(paging_mode(vcpu, features), pkru=pkru, pkrs=pkrs)
    return LiveTarget(vcpu=vcpu, features=features, mode=mode,
                      memory=open_ram(driver, name, writable=writable))


_GPA_RE = re.compile(r"gpa:\s*((?:0x)?[0-9a-fA-F]+)")  # %#x prints 0 as "0"


def qemu_gva2gpa(driver: Driver, name: str, gvas: Sequence[Gva], cpu: int = 0) -> list[int | None]:
    """QEMU's own answer for each address (HMP ``gva2gpa`` on vCPU ``cpu``); None = Unmapped."""
    out: list[int | None] = []
    for gva in gvas:
        text = str(driver.qmp(name, "human-monitor-command",
                              {"command-line": f"gva2gpa {gva:#x}", "cpu-index": cpu}))
        m = _GPA_RE.search(text)
        if m:
            out.append(int(m.group(1), 16))
        elif "Unmapped" in text:
            out.append(None)
        else:
            raise VmError(f"unexpected gva2gpa reply for {gva:#x}: {text.strip()!r}")
    return out


def save_pmem_dump(driver: Driver, name: str, path: Path, size: int | None = None) -> PmemDump:
    """QMP ``pmemsave`` of guest-physical ``[0, size)`` to ``path``, opened as a PmemDump.

    ``size`` defaults to the RAM below 4 GiB (reading the PCI hole would read device MMIO).
    """
    vm = driver.info(name)
    if size is None:
        size = q35_ram_layout(vm.spec.memory)[0].size
    driver.qmp(name, "pmemsave", {"val": 0, "size": size, "filename": str(path)})
    return PmemDump(path)
