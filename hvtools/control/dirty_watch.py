"""Live dirty rates of a VM, split by who wrote: the vCPUs and each vhost-user device.

The CPU side is QEMU's own ``calc-dirty-rate`` (qapi/migration.json; page-sampling mode, which
under TCG is the mode available). The device side is the backend's own dirty bitmap, transferred
by an atomic snapshot-and-clear (``harvest`` on its control channel, hvtools.vhost): the pages
the device wrote since the previous sample. Note the sampling is content based: QEMU's figure
also counts pages the device changed, while the device's figure counts only its own writes.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hvtools.control import vhost_backends
from hvtools.control.driver import Driver, VmState
from hvtools.errors import HvError, StateError, VmError

PAGE = 4096


def control_call(path: Path, method: str, params: dict[str, Any] | None = None, *,
                 timeout: float = 5.0) -> Any:
    """One request on a vhost-user backend's control channel (JSON lines)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
            s.sendall(json.dumps({"id": 1, "method": method, "params": params or {}}).encode()
                      + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        except OSError as err:
            raise VmError(f"the backend's control channel {path} does not answer: {err}") \
                from err
    try:
        reply = json.loads(buf)
    except ValueError as err:
        raise VmError(f"the backend at {path} answered {buf[:80]!r}") from err
    if "error" in reply:
        raise VmError(f"backend {method} failed: {reply['error']}")
    return reply.get("result")


@dataclass
class Sample:
    t: float
    interval_s: float
    cpu_bytes_s: int | None              # QEMU calc-dirty-rate
    devices: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _backends(driver: Driver, name: str) -> dict[str, Path]:
    """The control channels of a running VM's vhost-user backends, by device id."""
    vm = driver.info(name)
    if vm.state is not VmState.RUNNING:
        raise StateError(f"VM {name!r} is {vm.state}, not running")
    if vm.agent_socket is None:
        raise VmError(f"VM {name!r} has no state dir")
    d = vm.agent_socket.parent  # the backends' dir under both drivers
    return {dev: vhost_backends.BackendFiles(d, dev).control
            for dev in vhost_backends.vhost_devices(vm.spec)}


def watch(driver: Driver, name: str, *, interval: float = 1.0,
          count: int | None = None) -> Iterator[Sample]:
    """Yield one sample per ``interval`` seconds (at least 1: calc-dirty-rate's unit)."""
    secs = max(1, round(interval))
    ctl = _backends(driver, name)
    for path in ctl.values():
        control_call(path, "harvest")  # start from an empty bitmap
    n = 0
    while count is None or n < count:
        t0 = time.monotonic()
        driver.qmp(name, "calc-dirty-rate", {"calc-time": secs, "mode": "page-sampling"})
        cpu: int | None = None
        deadline = t0 + secs + 10
        while time.monotonic() < deadline:
            time.sleep(0.1)
            info = driver.qmp(name, "query-dirty-rate")
            if info.get("status") == "measured":
                cpu = int(info.get("dirty-rate", 0)) * 1024 * 1024
                break
        elapsed = time.monotonic() - t0
        sample = Sample(time.time(), round(elapsed, 3), cpu)
        for dev, path in ctl.items():
            try:
                got = control_call(path, "harvest")
            except HvError as err:
                raise VmError(f"device {dev}: {err}") from err
            pages = int(got.get("total", 0))
            sample.devices[dev] = {"pages": float(pages),
                                   "bytes_s": round(pages * PAGE / max(elapsed, 1e-6), 1)}
        n += 1
        yield sample
