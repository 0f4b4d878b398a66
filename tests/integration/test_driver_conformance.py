"""One conformance suite, run unchanged against the qemu and the libvirt driver.

start → exec → list → stop, and crash detection, on real QEMU under TCG.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from hvtools.control.driver import Driver, VmState
from hvtools.control.drivers import make_driver
from hvtools.errors import StateError, VmCrashed
from hvtools.spec import spec_from_mapping
from tests.integration.conftest import VmFactory, qemu_pids_for


def _boot(driver: Driver, vms: VmFactory, suffix: str, **spec: object) -> str:
    name = vms.name(suffix)
    driver.create(spec_from_mapping({"name": name, "memory": "512M", **spec}))
    info, timings = driver.start(name)
    assert info.state is VmState.RUNNING
    assert 0 < timings.launched_s < timings.agent_ready_s
    print(f"{driver.name}: boot-to-agent-ready {timings.agent_ready_s:.2f}s")
    return name


def test_start_exec_list_stop(driver: Driver, vms: VmFactory) -> None:
    name = _boot(driver, vms, "life")
    info = driver.info(name)
    assert info.pid is not None and qemu_pids_for(name) == [info.pid]
    assert info.accel == "tcg"

    res = driver.exec(name, ["cat", "/proc/cmdline"])
    assert res.status == 0
    cmdline = res.stdout.decode()
    assert "intel_iommu=on,sm_on" in cmdline and "console=ttyS0" in cmdline

    res = driver.exec(name, ["sh", "-c", "echo to-out; echo to-err >&2; exit 7"])
    assert (res.status, res.stdout, res.stderr) == (7, b"to-out\n", b"to-err\n")

    res = driver.exec(name, ["cat"], stdin=b"through stdin")
    assert res.stdout == b"through stdin"

    listed = {i.name: i for i in driver.list()}
    assert listed[name].state is VmState.RUNNING

    with pytest.raises(StateError, match="already running"):
        driver.start(name)

    how = driver.stop(name)
    assert how == "agent"
    assert driver.info(name).state is VmState.DEFINED
    assert qemu_pids_for(name) == []
    assert info.agent_socket is not None and not info.agent_socket.exists()
    with pytest.raises(StateError, match="not running"):
        driver.stop(name)


def test_crash_detection(driver: Driver, vms: VmFactory) -> None:
    name = _boot(driver, vms, "crash", iommu="legacy")
    pid = driver.info(name).pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while driver.info(name).state is not VmState.CRASHED and time.monotonic() < deadline:
        time.sleep(0.1)
    info = driver.info(name)
    assert info.state is VmState.CRASHED
    assert info.log_tail, "a crashed VM reports the last lines of its log"
    with pytest.raises(VmCrashed):
        driver.exec(name, ["true"])
    with pytest.raises(StateError, match="stale state"):
        driver.start(name)
    driver.kill(name)  # cleans the stale state
    assert driver.info(name).state is VmState.DEFINED
    assert qemu_pids_for(name) == []


# PCI vendor:device IDs the guest must see (virtio 1.x s4.1.2: 0x1040 + device id; ivshmem 1110).
_PCI_IDS = {"virtio-rng": "0x1af4:0x1044", "virtio-blk": "0x1af4:0x1042",
            "virtio-net": "0x1af4:0x1041", "ivshmem": "0x1af4:0x1110",
            "virtio-serial": "0x1af4:0x1043"}


def test_devices_visible_in_guest(driver: Driver, vms: VmFactory, tmp_path: object) -> None:
    """Every device of the spec shows up in the guest's PCI tree, modern-only behind the IOMMU."""
    from pathlib import Path

    disk = Path(str(tmp_path)) / "disk.img"
    disk.write_bytes(b"hvtools-disk-marker".ljust(1 << 20, b"\0"))
    disk.chmod(0o644)
    name = vms.name("devs")
    driver.create(spec_from_mapping({
        "name": name, "memory": "512M",
        "devices": [{"type": "virtio-rng"}, {"type": "virtio-blk", "path": str(disk)},
                    {"type": "virtio-net"}],
        "ivshmem": [{"name": f"{name}-shm", "size": "1M"}]}))
    driver.start(name)
    res = driver.exec(name, ["sh", "-c", "for d in /sys/bus/pci/devices/*; do "
                             "echo $(cat $d/vendor):$(cat $d/device); done"])
    seen = set(res.stdout.decode().split())
    for dev, ids in _PCI_IDS.items():
        assert ids in seen, f"{dev} ({ids}) not in guest PCI devices {sorted(seen)}"
    # The guest's DMA for virtio-blk goes through the vIOMMU: read the disk back through it.
    blk = driver.exec(name, ["sh", "-c", "modprobe virtio_blk && sleep 0.3 && "
                             "head -c 19 /dev/vda"])
    assert blk.status == 0, blk.stderr
    assert blk.stdout == b"hvtools-disk-marker"
    groups = driver.exec(name, ["sh", "-c", "ls /sys/kernel/iommu_groups | wc -l"])
    assert int(groups.stdout) >= 4, "virtio devices behind the vIOMMU get IOMMU groups"


def test_concurrent_starts_launch_one_qemu(driver: Driver, vms: VmFactory) -> None:
    """Two starts racing on one VM: exactly one wins, the other gets StateError."""
    from concurrent.futures import ThreadPoolExecutor

    name = vms.name("race")
    driver.create(spec_from_mapping({"name": name, "memory": "256M", "iommu": "none"}))

    def start() -> str:
        try:
            make_driver(driver.name).start(name)
            return "started"
        except StateError:
            return "refused"

    with ThreadPoolExecutor(2) as pool:
        results = sorted(pool.map(lambda _: start(), range(2)))
    assert results == ["refused", "started"]
    info = driver.info(name)
    assert qemu_pids_for(name) == [info.pid]
    driver.stop(name)
    assert qemu_pids_for(name) == []


def test_guest_poweroff_is_a_clean_stop(driver: Driver, vms: VmFactory) -> None:
    """A guest that powers itself off is shut off, not crashed, and leaves no runtime files."""
    name = _boot(driver, vms, "poweroff", iommu="none")
    driver.exec(name, ["sh", "-c", "(sleep 0.2; poweroff -f) </dev/null >/dev/null 2>&1 &"])
    deadline = time.monotonic() + 20
    while qemu_pids_for(name) and time.monotonic() < deadline:
        time.sleep(0.1)
    info = driver.info(name)
    assert info.state is VmState.DEFINED, info
    assert info.agent_socket is not None and not info.agent_socket.exists()
    if driver.name == "qemu":
        from hvtools.control.qemu_driver import ram_path

        assert not ram_path(name).exists()
        assert info.state_dir is not None and not (info.state_dir / "qemu.pid").exists()
    driver.start(name)  # and it starts again
    driver.stop(name)
