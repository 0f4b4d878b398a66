"""The pyverbs backend (placeholder until the RC/rdma_cm implementation lands)."""

from __future__ import annotations

from hvtools.errors import NoRdmaDeviceError
from hvtools.transport.api import Endpoint


def VerbsEndpoint(address: str | None = None, port: int | None = None) -> Endpoint:
    raise NoRdmaDeviceError("no RDMA device (ibv_get_device_list is empty)")


def rdma_devices() -> list[str]:
    """Names of this host's RDMA devices (as ibv_get_device_list(3) lists them)."""
    sysfs = "/sys/class/infiniband"
    import os

    return sorted(os.listdir(sysfs)) if os.path.isdir(sysfs) else []
