"""Reading a guest's VT-d capability registers two ways and comparing them.

1. What the guest kernel reports: sysfs ``/sys/class/iommu/dmarN/intel-iommu/{cap,ecap}`` and,
   when present, the ``dmarN: reg_base_addr … cap … ecap …`` line in its log.
2. The DMAR MMIO registers themselves, read through the monitor: ``xp /2gx`` at
   DMAR base + 0x08 (CAP_REG) and + 0x10 (ECAP_REG), VT-d 4.x s10.4.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hvtools.control.driver import Driver
from hvtools.errors import StateError
from hvtools.iommu.regs import (
    CAP_REG_OFFSET,
    Q35_DMAR_BASE,
    IommuCaps,
    parse_kernel_dmar_line,
    parse_xp_quadwords,
)


@dataclass(frozen=True)
class CapsReport:
    """CAP/ECAP as each source saw them, and whether the sources agree."""

    vm: str
    sources: dict[str, IommuCaps]
    notes: list[str] = field(default_factory=list)

    @property
    def agree(self) -> bool:
        values = {(c.cap, c.ecap) for c in self.sources.values()}
        return len(values) == 1

    @property
    def caps(self) -> IommuCaps:
        """The MMIO registers if read, else the guest's view."""
        return self.sources.get("mmio") or next(iter(self.sources.values()))

    def to_json(self) -> dict[str, Any]:
        return {"vm": self.vm, "agree": self.agree,
                "sources": {k: {"cap": f"{v.cap:#018x}", "ecap": f"{v.ecap:#018x}"}
                            for k, v in self.sources.items()},
                "notes": self.notes, **self.caps.to_json()}


def read_caps(driver: Driver, name: str) -> CapsReport:
    """Read CAP/ECAP from the guest kernel and from MMIO; raise if the VM has no vIOMMU."""
    vm = driver.info(name)
    if vm.spec.iommu is None:
        raise StateError(f"VM {name!r} has no vIOMMU (started with --iommu none)")
    sources: dict[str, IommuCaps] = {}
    notes: list[str] = []
    sysfs = driver.exec(name, ["sh", "-c",
                               "cat /sys/class/iommu/dmar0/intel-iommu/cap "
                               "/sys/class/iommu/dmar0/intel-iommu/ecap"], timeout=15)
    words = sysfs.stdout.split()
    if sysfs.status == 0 and len(words) == 2:
        sources["guest-sysfs"] = IommuCaps(int(words[0], 16), int(words[1], 16))
    else:
        notes.append("guest sysfs has no dmar0 (is intel_iommu=on in the guest's cmdline?): "
                     + sysfs.stderr.decode(errors="replace").strip())
    dmesg = driver.exec(name, ["dmesg"], timeout=15)
    units = parse_kernel_dmar_line(dmesg.stdout.decode(errors="replace"))
    if "dmar0" in units:
        sources["guest-dmesg"] = units["dmar0"]
    else:
        notes.append("the guest kernel log has no 'dmar0: reg_base_addr … cap … ecap' line "
                     "(Linux prints it at debug level)")
    xp = driver.hmp(name, f"xp /2gx {Q35_DMAR_BASE + CAP_REG_OFFSET:#x}")
    regs = parse_xp_quadwords(xp)
    if len(regs) == 2:
        sources["mmio"] = IommuCaps(regs[0], regs[1])
    else:
        notes.append(f"could not parse the monitor's xp output: {xp.strip()[:120]!r}")
    for src, c in sources.items():
        if c.get("PASID") and c.get("PSS") == 0:
            # QEMU 10.0 sets ECAP.PASID without ECAP.PSS (vtd_cap_init); later QEMU sets both.
            notes.append(f"{src}: ECAP.PASID=1 with PSS=0, so PASIDs are 1 bit wide as "
                         "advertised (QEMU 10.0 does not set PSS)")
            break
    if not sources:
        raise StateError(f"VM {name!r}: no source gave the VT-d registers: {'; '.join(notes)}")
    return CapsReport(vm=name, sources=sources, notes=notes)
