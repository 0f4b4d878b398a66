"""The CLI as a user drives it: the happy path, and every bad input from the foundation issue.

Each bad input must give one line on stderr, exit status 2, and change nothing: no state dir,
no QEMU process, no socket.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hvtools import paths
from hvtools.guest.image import GuestImage
from tests.integration.conftest import RUN, hvtools_cli, qemu_pids_for


@pytest.fixture
def name(image: GuestImage) -> Iterator[str]:
    n = f"{RUN}-cli"
    yield n
    hvtools_cli("vm", "kill", n)
    hvtools_cli("vm", "rm", n)


def _assert_one_line_error(res: object, needle: str, code: int = 2) -> None:
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)  # type: ignore[attr-defined]
    lines = res.stderr.strip().splitlines()  # type: ignore[attr-defined]
    assert len(lines) == 1, res.stderr  # type: ignore[attr-defined]
    assert needle in lines[0], lines[0]


def _nothing_left(name: str) -> None:
    """No state dir, QEMU, RAM file or libvirt domain of ``name`` remains."""
    from hvtools.control.qemu_driver import ram_path

    assert not (paths.vms_dir() / name).exists()
    assert qemu_pids_for(name) == []
    assert not ram_path(name).exists()
    listed = json.loads(hvtools_cli("vm", "list", "--json").stdout)
    assert all(v["name"] != name for v in listed)


@pytest.mark.parametrize(("args", "needle"), [
    (["--device", "virtio-gpu"], "unknown device 'virtio-gpu'"),
    (["--memory", "lots"], "'lots' is not a size"),
    (["--vcpus", "0"], "need at least 1"),
    (["--iommu", "pasid"], "PASID needs scalable mode"),
    (["--iommu", "scalable,warp"], "unknown word 'warp'"),
])
def test_bad_spec_input(name: str, args: list[str], needle: str) -> None:
    _assert_one_line_error(hvtools_cli("vm", "start", name, *args), needle)
    _nothing_left(name)


def test_unknown_option_is_a_usage_error(name: str) -> None:
    _assert_one_line_error(hvtools_cli("vm", "start", name, "--frobnicate"), "No such option")
    _nothing_left(name)


@pytest.mark.parametrize("drv", ["qemu", "libvirt"])
def test_bad_input_changes_nothing_on_either_driver(name: str, drv: str) -> None:
    _assert_one_line_error(hvtools_cli("vm", "start", name, "--driver", drv, "--memory", "1X"),
                           "'1X' is not a size")
    _assert_one_line_error(
        hvtools_cli("vm", "start", name, "--driver", drv, "--device", "virtio-blk:nope.img"),
        "does not exist")
    _nothing_left(name)


def test_pasid_with_device_iotlb_is_refused_before_qemu(name: str) -> None:
    _assert_one_line_error(hvtools_cli("vm", "start", name, "--iommu",
                                       "scalable,pasid,device-iotlb"), "device-iotlb")
    _nothing_left(name)


def test_missing_qemu(name: str) -> None:
    res = hvtools_cli("vm", "start", name, env={"HVTOOLS_QEMU": "/nonexistent/qemu"})
    _assert_one_line_error(res, "does not exist")
    _nothing_left(name)


def test_qemu_too_old(name: str, tmp_path: Path) -> None:
    old = tmp_path / "qemu-system-x86_64"
    old.write_text("#!/bin/sh\necho 'QEMU emulator version 7.2.0 (Debian 1:7.2+dfsg-7)'\n")
    old.chmod(old.stat().st_mode | stat.S_IEXEC)
    res = hvtools_cli("vm", "start", name, env={"HVTOOLS_QEMU": str(old)})
    _assert_one_line_error(res, "QEMU 7.2.0")
    assert "too old" in res.stderr
    _nothing_left(name)


def test_unknown_vm(name: str) -> None:
    for cmd in (["vm", "stop", name], ["vm", "exec", name, "--", "true"], ["vm", "show", name],
                ["iommu", "caps", name]):
        _assert_one_line_error(hvtools_cli(*cmd), f"no VM named '{name}'")


def test_failed_boot_leaves_nothing(name: str) -> None:
    """A guest that panics at boot: a clear error, no QEMU, no socket, no definition."""
    res = hvtools_cli("vm", "start", name, "--iommu", "none", "--memory", "256M",
                      "--kernel-args", "rdinit=/nonexistent")
    assert res.returncode == 1, res.stderr
    assert "died while booting" in res.stderr or "did not boot" in res.stderr
    _nothing_left(name)


@pytest.mark.parametrize("drv", ["qemu", "libvirt"])
def test_lifecycle_and_errors(name: str, drv: str) -> None:
    """The issue's acceptance sequence, through the CLI, on each driver."""
    res = hvtools_cli("vm", "start", name, "--driver", drv, "--iommu", "scalable,pasid,flts",
                      "--timings")
    assert res.returncode == 0, res.stderr
    assert "boot-to-agent-ready" in res.stdout
    print(res.stdout)

    # Name in use, and starting a running VM.
    _assert_one_line_error(hvtools_cli("vm", "create", name), "already exists")
    _assert_one_line_error(hvtools_cli("vm", "start", name), "already running")

    res = hvtools_cli("vm", "exec", name, "--", "cat", "/proc/cmdline")
    assert res.returncode == 0 and "intel_iommu=on,sm_on" in res.stdout
    res = hvtools_cli("vm", "exec", name, "--", "sh", "-c", "exit 42")
    assert res.returncode == 42
    res = hvtools_cli("vm", "exec", "-i", name, "--", "tr", "a-z", "A-Z", input=b"piped in\n")
    assert (res.returncode, res.stdout) == (0, "PIPED IN\n")

    caps = json.loads(hvtools_cli("iommu", "caps", name, "--json").stdout)
    assert caps["agree"] is True
    assert caps["ECAP"]["SMTS"] == 1 and caps["ECAP"]["FSTS"] == 1
    assert caps["ECAP"]["PASID"] == 1 and caps["derived"]["pasid_bits"] > 0
    assert {"guest-sysfs", "mmio"} <= set(caps["sources"])

    listed = json.loads(hvtools_cli("vm", "list", "--json").stdout)
    assert any(v["name"] == name and v["state"] == "running" for v in listed)
    reply = json.loads(hvtools_cli("vm", "qmp", name, "query-status").stdout)
    assert reply["status"] == "running"

    # A stale state dir from a killed QEMU.
    pid = json.loads(hvtools_cli("vm", "show", name, "--json").stdout)["pid"]
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)
    shown = json.loads(hvtools_cli("vm", "show", name, "--json").stdout)
    assert shown["state"] == "crashed" and shown["detail"] and shown["log_tail"]
    if drv == "qemu":
        assert "SIGKILL" in shown["detail"]
    _assert_one_line_error(hvtools_cli("vm", "start", name), "stale state")
    assert hvtools_cli("vm", "kill", name).returncode == 0
    assert qemu_pids_for(name) == []
    assert json.loads(hvtools_cli("vm", "show", name, "--json").stdout)["state"] == "defined"
    assert hvtools_cli("vm", "rm", name).returncode == 0
    assert all(v["name"] != name for v in json.loads(hvtools_cli("vm", "list", "--json").stdout))
    assert not (paths.vms_dir() / name).exists()
