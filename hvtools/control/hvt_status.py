"""A running VM's hvt-pci devices as the host sees them: QOM properties read over QMP.

The patched device (qemu-patches/0003) exposes its engine and secure interface as read-only QOM
properties (``x-dma-completed``, ``x-dma-blocked``, ``x-status``, ``x-window-*``) next to its
configuration (``security-level``, ``pasid-width``), so the host can inspect it without touching
guest-visible registers: reading STATUS through BAR0 from the monitor would be a guest-visible
access to a device a guest driver owns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hvtools.control.driver import Driver
from hvtools.control.hvt_qtest import HvtCode, HvtPasidReg, HvtStatus
from hvtools.errors import StateError, UsageError
from hvtools.spec import DeviceType


@dataclass(frozen=True)
class HvtDeviceStatus:
    """One hvt-pci device of a running VM."""

    id: str
    security_level: str
    pasid_width: int
    completed: int
    blocked: int
    status: int
    window_enabled: bool
    window_base: int
    window_size: int
    window_pasid: int

    @property
    def code(self) -> int:
        return HvtStatus.field("CODE").get(self.status)

    @property
    def code_name(self) -> str:
        try:
            return HvtCode(self.code).name
        except ValueError:
            return f"{self.code:#x}"

    def window_text(self) -> str:
        if not self.window_enabled:
            return "none registered"
        tag = HvtPasidReg.decode(self.window_pasid)
        pasid = f"PASID {tag['PASID']:#x}" if tag["VALID"] else "no PASID"
        return (f"{self.window_base:#x}..{self.window_base + self.window_size - 1:#x} "
                f"({self.window_size // 1024} KiB, {pasid}; locked until reset)")

    def to_json(self) -> dict[str, Any]:
        st = HvtStatus.decode(self.status)
        return {
            "id": self.id, "security_level": self.security_level,
            "pasid_width": self.pasid_width, "completed": self.completed,
            "blocked": self.blocked,
            "status": {"raw": self.status, "done": bool(st["DONE"]), "busy": bool(st["BUSY"]),
                       "error": bool(st["ERROR"]), "overrun": bool(st["OVERRUN"]),
                       "code": self.code, "code_name": self.code_name},
            "window": {"enabled": self.window_enabled, "base": self.window_base,
                       "size": self.window_size, "pasid": self.window_pasid},
        }


def hvt_status(driver: Driver, name: str) -> list[HvtDeviceStatus]:
    """Every hvt-pci device of running VM ``name``, in spec order."""
    vm = driver.info(name)
    ids = [d.id for d in vm.spec.devices if d.type is DeviceType.HVT_PCI]
    if not ids:
        raise UsageError(f"VM {name!r} has no hvt-pci device (add one with --device hvt-pci)")
    if not vm.state.active:
        raise StateError(f"VM {name!r} is {vm.state}; it must be running "
                         f"(hvtools vm start {name})")
    out = []
    for dev_id in ids:
        path = f"/machine/peripheral/{dev_id}"

        def get(prop: str, path: str = path) -> Any:
            return driver.qmp(name, "qom-get", {"path": path, "property": prop})

        out.append(HvtDeviceStatus(
            id=dev_id, security_level=str(get("security-level") or "trusted"),
            pasid_width=int(get("pasid-width")), completed=int(get("x-dma-completed")),
            blocked=int(get("x-dma-blocked")), status=int(get("x-status")),
            window_enabled=bool(int(get("x-window-enabled")) & 1),
            window_base=int(get("x-window-base")), window_size=int(get("x-window-size")),
            window_pasid=int(get("x-window-pasid"))))
    return out
