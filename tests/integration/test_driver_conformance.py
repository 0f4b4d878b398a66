"""One conformance suite, run unchanged against the qemu and the libvirt driver.

start → exec → list → stop, and crash detection, on real QEMU under TCG.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from hvtools.control.driver import Driver, VmState
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
