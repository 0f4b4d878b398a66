"""A lab host's own libvirtd and virtlogd (``libvirt = true`` in the lab spec).

Not built yet: `lab up` refuses ``libvirt = true`` with a clear error.
"""

from __future__ import annotations

from hvtools.errors import DependencyError
from hvtools.lab.hosts import HostHandle


def _quiet(_msg: str) -> None:
    pass


def start_host_libvirt(host: HostHandle, *, progress: object = _quiet) -> None:
    raise DependencyError(f"{host.name}: per-host libvirtd is not implemented yet")


def host_libvirt_up(host: HostHandle) -> bool:
    return False


def stop_host_libvirt(lab: str, host: str, *, progress: object = _quiet) -> None:
    return None
