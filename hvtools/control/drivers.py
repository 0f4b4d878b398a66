"""Choosing a driver, and finding which driver holds a VM.

VM names are unique on a host across both drivers, so a name alone finds its VM. libvirt is
only asked when its daemon is already listening: a lookup never starts a daemon.
"""

from __future__ import annotations

from hvtools.control.driver import Driver, VmInfo
from hvtools.errors import NameInUseError, UnknownVmError, UsageError

DRIVERS = ("qemu", "libvirt")


def make_driver(kind: str) -> Driver:
    """A driver by name: ``qemu`` (embedded) or ``libvirt`` (qemu:///system)."""
    if kind == "qemu":
        from hvtools.control.qemu_driver import QemuDriver

        return QemuDriver()
    if kind == "libvirt":
        from hvtools.control.libvirt_driver import LibvirtDriver

        return LibvirtDriver()
    raise UsageError(f"unknown driver {kind!r} (known: {', '.join(DRIVERS)})")


def _holders(name: str) -> list[Driver]:
    from hvtools.libvirt.daemon import libvirtd_reachable

    found = []
    for kind in DRIVERS:
        if kind == "libvirt" and not libvirtd_reachable():
            continue
        drv = make_driver(kind)
        try:
            drv.info(name)
        except UnknownVmError:
            continue
        found.append(drv)
    return found


def list_all(explicit: str | None = None) -> list[tuple[Driver, list[VmInfo]]]:
    """Every driver's VMs: the explicit driver's, else qemu's and (if it runs) libvirt's."""
    from hvtools.libvirt.daemon import libvirtd_reachable

    kinds = [explicit] if explicit else [k for k in DRIVERS
                                         if k != "libvirt" or libvirtd_reachable()]
    out = []
    for kind in kinds:
        drv = make_driver(kind)
        out.append((drv, drv.list()))
    return out


def find_driver(name: str, explicit: str | None = None) -> Driver:
    """The driver holding VM ``name`` (the explicit one must hold it); UnknownVmError if none."""
    if explicit:
        drv = make_driver(explicit)
        drv.info(name)
        return drv
    found = _holders(name)
    if not found:
        raise UnknownVmError(f"no VM named {name!r} (hvtools vm list)")
    return found[0]


def ensure_name_free(name: str) -> None:
    """Raise NameInUseError if any driver already has a VM called ``name``."""
    found = _holders(name)
    if found:
        raise NameInUseError(f"a VM named {name!r} already exists ({found[0].name} driver)")
